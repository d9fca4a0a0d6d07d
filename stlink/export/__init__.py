"""Export and scoring.

    stlink.export.onnx_export   export_onnx, export_step, check_parity (needs PyTorch)
    stlink.export.forecast      forecast, forecast_step, make_session (onnxruntime only, no PyTorch)
    stlink.export.card          read_card, ModelCard, ExportError: the sidecar both sides share

Import from the submodules; this package imports nothing, so scoring never loads torch.
"""
