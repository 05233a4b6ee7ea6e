"""Self-play generation: prompts, the vLLM sampler, the Ray Data stage, the Evol-Instruct rewrites."""
