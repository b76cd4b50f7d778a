"""LoRA evaluation: render a grid of images, score them (CLIP, DINO, frequency artifacts, an LLM judge),
write CSVs, and report plots and an HTML page. `flux_eval_lora.py` is the thin entry point over it."""
