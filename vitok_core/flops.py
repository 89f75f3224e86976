"""Training FLOPs of the autoencoder and the peak FLOP/s used for MFU.

Per valid token, forward + backward: 6 N (every parameter in a multiply-add, 3 passes) plus attention's
score and value products, 12 L d T for a tower of L layers of width d at sequence length T (PaLM
appendix B). Encoder and decoder see the same tokens, so the two towers simply add. Activation
recomputation is not counted: MFU measures useful work, not the work done.
"""

from __future__ import annotations

from vitok_core.variants import VariantSpec

# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), per GPU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def train_flops_per_token(spec: VariantSpec, parameters: int, seq_len: int) -> float:
    """6 N + 12 (L_enc d_enc + L_dec d_dec) T."""
    attention = 12 * (spec.encoder.depth * spec.encoder.width + spec.decoder.depth * spec.decoder.width) * seq_len
    return 6.0 * parameters + attention


def peak_flops(device_name: str | None, configured_tflops: float = 0.0) -> tuple[float | None, str]:
    """(peak FLOP/s per worker, where the number comes from). A configured value wins; else a known GPU."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "train.peak_tflops"
    for name, flops in PEAK_BF16_FLOPS.items():
        if device_name and name in device_name.upper():
            return flops, f"{name} dense bf16 data sheet"
    return None, "unknown device: set train.peak_tflops for MFU"
