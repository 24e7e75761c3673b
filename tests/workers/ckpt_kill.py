"""Worker (plain process): writes an HF checkpoint slowly into an atomic output, to be SIGKILLed.

argv: SRC_SAFETENSORS OUT_DIR. Prints WRITING once a few tensors are on disk, then keeps writing
slowly. Uses only torch and safetensors (no transformers) so that it starts quickly.
"""
import sys
import time

from safetensors import safe_open

from megatron_rl.checkpoint import hf as hfio
from megatron_rl.checkpoint import publish


def main():
    src, out = sys.argv[1:3]
    with safe_open(src, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    with publish.atomic_dir(out) as tmp:
        with hfio.SafetensorsStreamWriter(tmp, shapes=shapes, dtype=next(iter(tensors.values())).dtype) as w:
            for i, name in enumerate(w.names):
                w.write(name, tensors[name])
                if i == 5:
                    for fh in w._fh.values():  # the open shard files
                        fh.flush()
                    print("WRITING", flush=True)
                if i >= 5:
                    time.sleep(1.0)


if __name__ == "__main__":
    main()
