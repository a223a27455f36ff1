#!/usr/bin/env python
"""Brain mask of one image with deepbet (run inside the benchmark venv, `make .venv-bench`).

    .venv-bench/bin/python scripts/deepbet_mask.py IMAGE MASK [--threads N] [--gpu]

Uses deepbet's Python API (`deepbet.BrainExtraction`, weights shipped in its wheel) with its
defaults: probability threshold 0.5, no dilation. The mask is written on the input's grid.
Only scripts/bench_synthstrip.py needs this; SynthKit itself never imports deepbet.
"""

import argparse


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('image', help='input image (NIfTI)')
    p.add_argument('mask', help='output brain mask (NIfTI)')
    p.add_argument('--threads', type=int, help='torch CPU threads')
    p.add_argument('--gpu', action='store_true', help='let deepbet use a GPU if there is one')
    args = p.parse_args()

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)
    from deepbet import BrainExtraction

    bet = BrainExtraction(no_gpu=not args.gpu)
    bet.run(args.image, mask_path=args.mask)


if __name__ == '__main__':
    main()
