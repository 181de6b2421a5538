"""Inference: a trained classifier loaded once (`load`), answering and evaluating rows (`engine`), its forward
passes (`kernels`), probability calibration (`calibration`), HTTP (`serve`) and streamed files (`batch_files`).

Nothing is imported here, so that importing one module (the server's, say) loads no model code.
"""
