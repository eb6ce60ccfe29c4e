"""The LoRA model: specs, where the LoRA config comes from, openpi's LoRA equations, and adapter discovery."""
