"""ACE-Step 1.5 through diffusers: the pipeline's own components, the cached latents, the objective, the LoRA.

- :mod:`~audiotune.models.acestep.load` — a diffusers ``AceStepPipeline`` folder, strictly checked.
- :mod:`~audiotune.models.acestep.latents` — the Latents artifact (VAE latents + packed conditioning per song).
- :mod:`~audiotune.models.acestep.objective` — ACE-Step 1.5's flow-matching loss and timestep draws.
- :mod:`~audiotune.models.acestep.lora` — PEFT LoRA on the transformer and its export in diffusers' format.
"""

from audiotune.errors import ModelLoadError


class AceStepError(ModelLoadError):
    """An ACE-Step base model, Latents artifact or LoRA that cannot be used (names the file and the field)."""


__all__ = ["AceStepError"]
