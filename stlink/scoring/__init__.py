"""Batch scoring with onnxruntime (no PyTorch): the pipeline step ``forecast`` / DVC stage ``score``.

    inputs.py    input -> the regular windows of the issue times asked for (structural checks)
    status.py    per-sensor verdicts: which windows can be forecast, and why not
    session.py   the onnxruntime session for a device, graph-vs-card check, the batch runner
    output.py    the forecast table, its validation, the output location, the unnamed-then-linked file
    score.py     ``forecast()`` (the step), ``plan()`` (checks only), the promotion gate's test-window check
"""
from stlink.scoring.inputs import Windows, load_windows, parse_time, read_input
from stlink.scoring.output import (FORMATS, OUTPUT_COLUMNS, OutputValidationError, OutputValidator,
                                   check_output_location, forecast_rows, output_chunks, read_csv_output,
                                   validate_chunks, validate_output, write_table)
from stlink.scoring.score import Plan, forecast, output_check_on_test_windows, plan
from stlink.scoring.session import CPU, CUDA, DEVICES, DeviceError, make_session
from stlink.scoring.status import NO_FORECAST, OK, STATUSES, SensorStatus, sensor_status

__all__ = ["CPU", "CUDA", "DEVICES", "DeviceError", "FORMATS", "NO_FORECAST", "OK", "OUTPUT_COLUMNS",
           "OutputValidationError", "OutputValidator", "Plan", "STATUSES", "SensorStatus", "Windows",
           "check_output_location", "forecast", "forecast_rows", "load_windows", "make_session",
           "output_check_on_test_windows", "output_chunks", "parse_time", "plan", "read_csv_output", "read_input",
           "sensor_status", "validate_chunks", "validate_output", "write_table"]
