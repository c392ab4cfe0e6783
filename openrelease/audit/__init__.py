"""MOF auditing: the report, the evidence it rests on and the MOF rules."""
