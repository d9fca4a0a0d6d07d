"""Export and scoring.

    stlink.export.onnx_export   export_onnx, export_step, check_parity (needs PyTorch)
    stlink.scoring              batch scoring (onnxruntime only, no PyTorch); stlink.export.forecast re-exports it
    stlink.export.card          read_card, ModelCard, ExportError: the sidecar both sides share

Import from the submodules; this package imports nothing, so scoring never loads torch.
"""
