"""The maths of diffusion: schedules, denoisers, guidance, samplers. Knows nothing of the networks."""
