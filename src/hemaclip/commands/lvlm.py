"""`hemaclip lvlm run` and `hemaclip lvlm report`: parse the options, call :mod:`hemaclip.tasks.lvlm.runner`
and :mod:`hemaclip_research.lvlm`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from hemaclip.commands.common import CheckpointOption, DataOption, console
from hemaclip.io import check_output_dir
from hemaclip.tasks.lvlm import MAX_RESPONSE_BYTES


MIB = 1024 * 1024


def _positive_finite(value: float) -> float:
    """Refuse NaN, infinity and values <= 0 while the command line is parsed (a usage error, exit 2)."""
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, not {value}")
    return value


def register(app: typer.Typer) -> None:
    """Add the `lvlm` command group."""
    group = typer.Typer(help="Put any vision-language chat model (OpenAI-compatible API) on the cytomorphology LVLM protocols, "
                             "beside hemaclip.", no_args_is_help=True)
    app.add_typer(group, name="lvlm")

    @group.command("run")
    def run_command(
        endpoint: Annotated[str, typer.Option(help="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 "
                                                    "(nothing is sent anywhere else).")],
        model: Annotated[str, typer.Option(help="Model name the endpoint serves.")],
        out: Annotated[Path, typer.Option(help="Run folder (resumed if it exists): sample, answers cache, answers.")],
        protocol: Annotated[Optional[list[str]], typer.Option(
            help="zero-shot, few-shot, explain, features or all; repeat for several (default zero-shot).")] = None,
        api_key_env: Annotated[Optional[str], typer.Option(
            help="Name of the environment variable holding the API key (the key itself is never logged or stored).")] = None,
        per_class: Annotated[int, typer.Option(help="Cells per class from the PBC test split.")] = 50,
        seed: Annotated[int, typer.Option(help="Seed of the sample and of the few-shot examples.")] = 0,
        sample: Annotated[Optional[Path], typer.Option(
            help="Use this saved sample.csv (e.g. another run's) instead of drawing one.")] = None,
        concurrency: Annotated[int, typer.Option(help="Requests in flight at most.")] = 4,
        timeout: Annotated[float, typer.Option(callback=_positive_finite,
                                               help="Seconds a whole request may take (connect to last byte) before it is retried.")] = 120.0,
        max_response_mb: Annotated[float, typer.Option(callback=_positive_finite,
                                                       help="Largest answer body accepted, in MiB; a larger one is abandoned.")]
        = MAX_RESPONSE_BYTES / MIB,
        max_retries: Annotated[int, typer.Option(help="Retries per request (timeouts, connection errors, 429, 5xx).")] = 5,
        max_requests: Annotated[Optional[int], typer.Option(
            help="Request budget of this invocation, retries included; the run stops sending when it is spent.")] = None,
        max_tokens: Annotated[int, typer.Option(help="max_tokens of each request.")] = 1024,
        temperature: Annotated[float, typer.Option(help="Sampling temperature of each request.")] = 0.0,
        data: DataOption = None,
    ) -> None:
        """Ask a model the protocols on a saved PBC test sample; every answer is cached, so a stopped run resumes.

        Example: hemaclip lvlm run --endpoint http://127.0.0.1:8000/v1 --model Qwen2.5-VL-7B --out runs/lvlm-qwen --protocol all
        Exit status 2: the run is incomplete (failed requests or budget spent); run the same command again.
        """
        from hemaclip.tasks.lvlm.client import ClientSettings
        from hemaclip.tasks.lvlm.protocols import PROTOCOLS
        from hemaclip.tasks.lvlm.runner import run_lvlm

        check_output_dir(out)
        chosen = list(protocol or ["zero-shot"])
        if "all" in chosen:
            chosen = list(PROTOCOLS)
        settings = ClientSettings(concurrency=concurrency, timeout_s=timeout, max_retries=max_retries, max_requests=max_requests,
                                  max_tokens=max_tokens, temperature=temperature,
                                  max_response_bytes=max(1, int(max_response_mb * MIB)))
        summaries = run_lvlm(out, endpoint, model, chosen, api_key_env=api_key_env, settings=settings, per_class=per_class,
                             seed=seed, data_root=data, sample_csv=sample)
        for s in summaries.values():
            console.print(f"{s.protocol}: {s.answered}/{s.cells} answered ({s.cached} cached), {s.failed} failed, "
                          f"{s.not_sent} not sent, {s.unparseable} unparseable")
        console.print(f"run folder: {out}")
        if not all(s.complete for s in summaries.values()):
            console.print("incomplete: run the same command again to send what is missing")
            raise typer.Exit(2)

    @group.command("report")
    def report_command(
        runs: Annotated[list[Path], typer.Argument(help="Run folders of `hemaclip lvlm run` (e.g. runs/lvlm-*).")],
        out: Annotated[Path, typer.Option(help="Report folder: report.md, report.html, metrics.json, figures.")] = Path("reports/lvlm"),
        checkpoint: CheckpointOption = None,
        n_boot: Annotated[int, typer.Option(help="Bootstrap resamples of each interval.")] = 2000,
        hemaclip_rows: Annotated[bool, typer.Option("--hemaclip/--no-hemaclip", help="Also score hemaclip describe on the same cells.")] = True,
        data: DataOption = None,
    ) -> None:
        """Score the runs beside hemaclip on the same cells; no request is sent (answers come from the run folders).

        Example: hemaclip lvlm report runs/lvlm-* --out reports/lvlm
        """
        from hemaclip_research.lvlm import write_lvlm_report

        check_output_dir(out)
        paths = write_lvlm_report(runs, out, checkpoint=checkpoint, data_root=data, n_boot=n_boot, hemaclip=hemaclip_rows)
        for kind, path in paths.items():
            console.print(f"{kind}: {path}")
