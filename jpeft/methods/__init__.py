"""The PEFT methods, one module each: its config, how it adds its leaves to a tree (`inject`), and how it merges.

Reparameterisations beside a weight (`lora` with DoRA, `ia3`, `loha`, `lokr`, sharing `lycoris`), additive modules
(`adapters`, soft prompts: `prompt`, `ptuning`, `prefix`), `selective` tuning, and adapter arithmetic (`merging`,
`multi`).
"""
