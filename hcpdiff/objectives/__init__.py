"""Training objectives: how latents are noised, what the denoiser should predict, and the loss.

A family picks its objective (`Family.build_objective`); the trainer only calls `noised(latents)` and
`loss(prediction, noised)`.
"""
