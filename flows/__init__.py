"""Prefect orchestration of the stlink pipeline (the steps themselves live in ``stlink``).

    flows.training   training_pipeline: ingest -> validate -> prepare -> train -> evaluate -> export -> promote
    flows.forecast   batch_forecast: champion -> validate readings -> chunked forecasts -> validated output
    flows.serve      the nightly-retrain and batch-forecast deployments (``python -m flows.serve``)
    flows.tasks      retry policy, DVC stage runner, validation artifacts, the training concurrency slot
"""
