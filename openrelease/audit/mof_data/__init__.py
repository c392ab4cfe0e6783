"""MOF 1.0 data from the Model Openness Tool (MIT, see LICENSE-MOT): components and licenses."""
