"""PTQ: the calibration engine, GPTQ, and the initializers that seed QAT."""


def __getattr__(name):  # lazy: qat.methods imports qat.ptq.gptq, which must not import methods back
    if name == "initialize":
        from qat.ptq.initializers import initialize

        return initialize
    raise AttributeError(name)
