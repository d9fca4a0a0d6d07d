"""MLflow "models from code" file of the logged PyTorch forecaster (``mlflow_log.log_model``).

MLflow copies this file into the logged model, so loading the model needs torch and mlflow
only, not this package: ``predict({name: array, ...}) -> (B, H, N)`` runs the ``torch.export``
program (artifact ``program``) on the inputs named in the artifact ``input_names`` (JSON), in order.
Not imported by ``stlink`` itself.
"""
import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class ExportedForecaster(PythonModel):
    # The input is a dict of arrays checked against the logged tensor signature.  MLflow's
    # type-hint validation only knows list[...] inputs and warns at class creation without this
    # switch (the one its own dict-input models use).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import json

        import torch

        with open(context.artifacts["input_names"]) as fh:
            self.input_names = list(json.load(fh))
        self.module = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        missing = [n for n in self.input_names if n not in model_input]
        if missing:
            raise ValueError(f"model input lacks {missing}; expected {self.input_names}")
        with torch.no_grad():
            return self.module(*[torch.as_tensor(np.asarray(model_input[n])) for n in self.input_names]).numpy()


mlflow.models.set_model(ExportedForecaster())
