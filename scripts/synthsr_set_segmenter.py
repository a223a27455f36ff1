#!/usr/bin/env python
"""Put a (newer) SynthSeg network into a hybrid SynthSR model, keeping its U-Net.

The hybrid SynthSR network renders the T1 from the frozen SynthSeg's posteriors of the input,
so when SynthSeg improves, SynthSR can carry the better segmenter without retraining (then
measure it: make bench-synthsr). Works on an export (PREFIX.weights.h5 + PREFIX.json; the card
records the segmenter) and on a training checkpoint (RUN/ckpt.keras: the network's segmenter
and the loss term's, so a resumed run trains with the new one).

    scripts/synthsr_set_segmenter.py models/synthsr.weights.h5 --seg models/synthseg
    scripts/synthsr_set_segmenter.py runs/synthsr/ckpt.keras --seg models/synthseg
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'python'))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model', help='SynthSR export (.weights.h5) or checkpoint (.keras)')
    p.add_argument('--seg', required=True,
                   help='SynthSeg weights prefix (PREFIX.weights.h5 and PREFIX.json)')
    p.add_argument('--out', help='where to write (default: in place)')
    args = p.parse_args(argv)
    seg = args.seg[:-len('.weights.h5')] if args.seg.endswith('.weights.h5') else args.seg
    from synthkit.models.synthsr.task import replace_segmenter
    try:
        card = replace_segmenter(args.model, seg, args.out)
    except (OSError, ValueError) as e:
        print('error: %s' % e, file=sys.stderr)
        return 1
    print('%s: segmenter from %s (%s steps)' % (args.out or args.model, seg,
                                                card.get('training', {}).get('steps', '?')))
    return 0


if __name__ == '__main__':
    sys.exit(main())
