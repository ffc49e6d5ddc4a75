"""`mllm preference pairs`: arguments -> `mllm.course.self_pairs.build_pairs`."""

from __future__ import annotations

import argparse
import json

import mllm.course.self_pairs as self_pairs

from mllm.cli.arguments import add_device_arguments, non_negative_float, non_negative_int, positive_int, runtime_of


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm preference pairs", description=self_pairs.__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the policy that describes the images (and the reference)")
    parser.add_argument("--world", required=True, help="a synthetic world (mllm synth): scenes.jsonl, chair_gt.json")
    parser.add_argument("--out", required=True, help="folder for questions, samples, pairs.json")
    parser.add_argument("--images", type=positive_int, default=600, help="training images to describe")
    parser.add_argument("--samples", type=positive_int, default=4,
                        help="sampled descriptions per image (modes that sample)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-new-tokens", type=positive_int, default=160)
    parser.add_argument("--mode", choices=self_pairs.MODES, default="shape",
                        help="shape: each image's greedy description that misnames a shape vs the same with the "
                             "shapes renamed, the rejected one ending at the first misnamed shape; hedge (the "
                             "course's preference stage, with --named-shapes 0.075): the same with the misnamed "
                             "shapes called 'object' (fewer hallucinations, less Recall); continuation: each "
                             "image's greedy description with an error vs the same corrected from its first "
                             "error on; cut: the same with the rejected description ending at its first wrong "
                             "word (the course's polish pairs); corrected: each hallucinating sample vs itself "
                             "without its hallucinating sentences; balanced: those plus, per pair, the "
                             "corrected description vs the same minus one true sentence; ranked: an image's "
                             "least vs most hallucinating sample")
    parser.add_argument("--true-drops", type=non_negative_int, default=1,
                        help="balanced: pairs per corrected description, each against it minus a different "
                             "true sentence")
    parser.add_argument("--yesno-anchors", type=non_negative_float, default=0.34,
                        help="yes/no pairs (the world's yes/no training questions) per description pair")
    parser.add_argument("--box-anchors", type=non_negative_float, default=0.34,
                        help="grounding pairs (the world's referring expressions) per description pair")
    parser.add_argument("--count-anchors", type=non_negative_float, default=0.0,
                        help="count yes/no pairs (about the world's scenes, mostly a category held more than once) "
                             "per description pair")
    parser.add_argument("--hedge-below", type=non_negative_float, default=0.0,
                        help="hedge: also call 'object' each shape the model wrote with a probability below this")
    parser.add_argument("--named-shapes", type=non_negative_float, default=0.0,
                        help="hedge: pairs per hedge pair that keep a right shape against 'object'")
    parser.add_argument("--seed", type=int, default=0)
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runtime = runtime_of(parser, args)
    summary = self_pairs.build_pairs(args.model, args.world, args.out, args.images, args.samples, args.seed,
                                     args.batch_size, args.max_new_tokens, args.mode, args.true_drops,
                                     yesno_anchors=args.yesno_anchors, box_anchors=args.box_anchors,
                                     count_anchors=args.count_anchors, hedge_below=args.hedge_below,
                                     named_shapes=args.named_shapes, quiet=False, runtime=runtime)
    print(json.dumps(summary, indent=1))
    return 0

