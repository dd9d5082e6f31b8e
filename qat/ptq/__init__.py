"""PTQ: the calibration engine, GPTQ, and the initializers that seed QAT."""
