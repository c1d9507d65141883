"""The ACE-Step branch's steps (encode, export) for its components; training goes through
:func:`audiotune.orchestration.steps.train` like every other training stage."""

from __future__ import annotations

from audiotune.orchestration.steps import Outcome, durable_output, load, numeric


def encode(config: str, dataset: str, output: str) -> Outcome:
    """The encode stage of ``dataset`` into ``output`` with ``acestep.base_model``."""
    from audiotune.models.acestep.latents import KIND
    from audiotune.stages.encode_acestep import encode_acestep

    cfg = load(config, "encode_acestep config")
    result = encode_acestep(cfg, dataset=dataset, output=output)
    return Outcome(metrics=numeric(result.manifest, ("metrics",)), metadata={"kind": KIND})


def export(config: str, pipeline_run_id: str, model: str, output: str) -> Outcome:
    """Verify and package the ACE-Step LoRA into ``output`` or the durable location."""
    from audiotune.stages.export_acestep import KIND, export_acestep

    cfg = load(config, "export_acestep config")
    target = durable_output(cfg, pipeline_run_id, "export") or output
    result = export_acestep(cfg, model=model, output=target)
    if target != output:
        from audiotune import storage

        storage.download(target, output)
    return Outcome(metrics=numeric(result.manifest, ("metrics",)), metadata={"kind": KIND, "uri": target})
