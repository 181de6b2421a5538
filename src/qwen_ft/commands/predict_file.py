"""`qwen-ft predict`: label a file (jsonl / csv / parquet, or jsonl on stdin) with a trained classifier, streamed
and resumable (`qwen_ft.inference.labeling`, `qwen_ft.inference.batch_files`)."""

from __future__ import annotations

from qwen_ft.inference.batch_files import ID_COLUMNS


def run_predict_file(model_path: str, input_path: str, output_path: str, top: int = 1, resume: bool = False,
                     batch_size: int = 32, chunk_rows: int = 1024, id_column: str | None = None,
                     text_column: str | None = None, decode: str = "auto", normalize: str = "auto",
                     input_format: str | None = None, overwrite: bool = False, base_model: str | None = None,
                     precision: str = "auto", trust_remote_code: bool = False, min_confidence: float | None = None,
                     fallback_label: str | None = None, adapter_scale: float = 1.0) -> dict:
    from qwen_ft.inference.labeling import label_file

    return label_file(model_path, input_path, output_path, top=top, resume=resume, batch_size=batch_size,
                      chunk_rows=chunk_rows, id_column=id_column, text_column=text_column, decode=decode,
                      normalize=normalize, input_format=input_format, overwrite=overwrite, base_model=base_model,
                      precision=precision, trust_remote_code=trust_remote_code, min_confidence=min_confidence,
                      fallback_label=fallback_label, adapter_scale=adapter_scale)


def add_abstention_flags(p) -> None:
    """--min-confidence, --fallback-label and --adapter-scale: the same for predict, test and serve."""
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="Answer --fallback-label (abstained: true) when the label's probability is below P "
                        "(default: the run's threshold.json, from `validate --fit-threshold`, if any).")
    p.add_argument("--fallback-label", default=None,
                   help="The answer when abstaining (default: the run's catch-all label, e.g. 'other', else 'abstain').")
    p.add_argument("--adapter-scale", type=float, default=1.0,
                   help="Multiply the adapter's update by this (0: the base model, 1: the trained run).")


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Label a jsonl/csv/parquet file (streamed; resumable) with a trained run.")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train` (or `qwen-ft merge`).")
    p.add_argument("--input", required=True, help="Input .jsonl/.csv/.parquet file, or - for JSON lines on stdin.")
    p.add_argument("--output", required=True, help="Output file; its suffix (.jsonl/.csv/.parquet) sets the format.")
    p.add_argument("--top", type=int, default=1, help="Also write the K most probable labels per row (K > 1).")
    p.add_argument("--resume", action="store_true", help="Continue an interrupted run from OUTPUT.partial.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    p.add_argument("--batch-size", type=int, default=32, help="Rows per forward pass.")
    p.add_argument("--chunk-rows", type=int, default=1024, help="Rows read, classified and saved at a time.")
    p.add_argument("--id-column", default=None, help=f"Column copied to the output (default: {', '.join(ID_COLUMNS)}).")
    p.add_argument("--text-column", default=None, help="Column holding the text (default: question/text/...).")
    p.add_argument("--input-format", default=None, choices=("jsonl", "csv", "parquet"),
                   help="Format of --input when its suffix does not say (stdin: jsonl).")
    p.add_argument("--decode", default="auto", choices=("auto", "constrained", "exact"),
                   help="auto (default): constrained where answers end with an end token, else exact; constrained "
                        "(fast; probability of the first answer token); exact (each label's full probability).")
    p.add_argument("--normalize", default="auto", choices=("auto", "none", "token", "char"),
                   help="With --decode exact (auto: per character for plain prompts, else none).")
    p.add_argument("--base-model", default=None)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (see validate).")
    add_abstention_flags(p)
    p.set_defaults(func=lambda a: run_predict_file(
        a.model_path, a.input, a.output, a.top, a.resume, a.batch_size, a.chunk_rows, a.id_column, a.text_column,
        a.decode, a.normalize, a.input_format, a.overwrite, a.base_model, a.precision, a.trust_remote_code,
        a.min_confidence, a.fallback_label, a.adapter_scale))
