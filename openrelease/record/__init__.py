"""The provenance record: MLflow tracking, the journal, lineage and the workspace summary."""
