"""minidit: the Diffusion Transformer (DiT) from scratch in NumPy/CuPy, every backward pass by hand.

The mainline, in reading order (each module imports only the ones before it):

    xp            which array module an array belongs to; host <-> device; the fused-kernel table
    layers        every op as op_forward -> (out, cache) / op_backward(dout, cache) -> grads, and the sublayers
                  models compose (attention in three steps, MLP, adaLN, embedders, final layer)
    params        the flat parameter dict named like the official state_dict (take, named, check_keys)
    optim         AdamW and EMA, in place
    threads       every CPU core for NumPy: the batch in shards, one thread each
    cuda_kernels  fused CUDA kernels beside their references in layers / optim (imported with the cupy backend)
    backend       a backend by name: numpy, cupy, strict
    cli           what the commands share: flag types, output paths checked first, one-line errors
    digits        the built-in digits: the renderer's random parameters, images, clips
    text          the digits' captions, read off those parameters; the vocabulary and tokenizer
    data          datasets (digits, captioned digits, clips, image folders, latents); image output
    contract      what every model is and does: Spec (its constructor's one argument) and Model (what the commands
                  use, DiT's behaviour by default: conditions, dropout, sample shape, extra loss, options)
    model         DiT (adaLN-Zero): DiTSpec, VARIANTS, param shapes, FLOPs, forward, backward
    conditioning  the paper's other three designs (adaLN, cross-attention, in-context)
    mmdit         Stable Diffusion 3's MM-DiT: two token streams, one joint attention
    captions      text prompts -> images: a tiny learned text encoder and the MM-DiT that reads it
    dynamic       Dynamic DiT: timestep routers switch heads, MLP channels or blocks; the sampler skips them
    video         a spatio-temporal DiT for clips: 3-D patches, spatial and temporal blocks in turn (Latte)
    models        every kind of model in one table (MODELS): build one from a checkpoint's spec, or from options
    diffusion     the DDPM objective: schedule, loss with its gradient, samplers, guidance
    flow          the rectified-flow objective (SD3): straight path, velocity loss, Euler and Heun samplers
    gradcheck     central differences for the tests and notebooks
    checkpoint    the checkpoint format: save, read (older layouts upgraded), rebuild any model and objective
    vae           the Stable Diffusion VAE (forward only) and a safetensors reader
    sample        python -m minidit.sample
    distributed   training on N processes (mpiexec): each rank a shard of the batch, gradients summed by MPI or NCCL
    train         python -m minidit.train
    encode        python -m minidit.encode: an image folder -> the VAE latents DiT trains on
    convert       python -m minidit.convert: official DiT .pt checkpoints -> minidit's format

minidit.dev holds what checks and measures it (strict backend, PyTorch reference, bench, evaluate, experiments).
"""
from .model import VARIANTS, DiT, DiTConfig, DiTSpec, forward_macs, get_config, param_shapes

__all__ = ["DiT", "DiTConfig", "DiTSpec", "VARIANTS", "forward_macs", "get_config", "param_shapes"]
__version__ = "0.1.0"
