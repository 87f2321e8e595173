"""The conversion pipeline's steps: one module per step, each a plain function plus a thin @task.

    calibration  text (hub spec or local files) -> token ids, split and fingerprinted
    activations  forward hooks on each FFN -> per-neuron statistics + predictor training pairs
    predictors   per-layer low-rank predictors, thresholds calibrated to a recall target
    bundling     neuron order per layer, then the artifact through flashio's writer
    evaluation   dense vs sparse with the flashio runtime, threshold sweep, the accuracy gate
    publish      the artifact into a registry

Tasks pass paths and content hashes, never tensors: Prefect pickles and hashes task inputs.
The flow that orders them is `flows.convert`. Importing this package imports nothing heavy.
"""
