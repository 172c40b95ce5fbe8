"""Images/s for 1080p JPEGs: our preprocessor (policy checks, guarded decode, then
mistral-common's encoder) against calling mistral-common directly on the same data URLs, in
the same run: serially on one core, and ours with several images in flight; p50/p99 latency of
each preprocessing call.

    python bench/multimodal_preprocess.py [--images 40] [--concurrency 4]

Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from services.multimodal.preprocess import MultimodalPreprocessor  # noqa: E402
from services.settings import ImageSettings  # noqa: E402
from services.tokenizer import PromptTokenizer  # noqa: E402


def photo_like_jpeg(seed: int) -> str:
    """A 1920x1080 JPEG with smooth structure plus noise (compresses like a photo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:1080, 0:1920]
    base = np.stack([(x * (r + 1) / 15 + y * (r + 2) / 11) % 255 for r in range(3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def main() -> None:
    import cv2
    import torch
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    tokenizer = PromptTokenizer()
    # at the baseline's priority: the service's decode threads run niced (+10 by default),
    # which on a busy machine would count against ours what is only a priority
    pre = MultimodalPreprocessor(tokenizer, ImageSettings(decode_niceness=0))
    urls = [photo_like_jpeg(i) for i in range(4)]

    def direct(url):
        request = ChatCompletionRequest.from_openai(messages(url), reasoning_effort="none")
        return tokenizer._mt.encode_chat_completion(request)

    async def ours_serial(n):
        latencies = []
        for i in range(n):
            start = time.perf_counter()
            await pre.encode(messages(urls[i % len(urls)]), effort="none")
            latencies.append(time.perf_counter() - start)
        return latencies

    async def ours_concurrent(n, concurrency):
        gate, latencies = asyncio.Semaphore(concurrency), []

        async def one(i):
            async with gate:
                start = time.perf_counter()
                await pre.encode(messages(urls[i % len(urls)]), effort="none")
                latencies.append(time.perf_counter() - start)
        await asyncio.gather(*(one(i) for i in range(n)))
        return latencies

    direct(urls[0])
    start = time.perf_counter()
    direct_lat = []
    for i in range(args.images):
        t = time.perf_counter()
        direct(urls[i % len(urls)])
        direct_lat.append(time.perf_counter() - t)
    rows = {"mistral_common_direct": (args.images / (time.perf_counter() - start), direct_lat)}
    asyncio.run(ours_serial(1))
    start = time.perf_counter()
    lat = asyncio.run(ours_serial(args.images))
    rows["small4_preprocessor"] = (args.images / (time.perf_counter() - start), lat)
    start = time.perf_counter()
    lat = asyncio.run(ours_concurrent(args.images, args.concurrency))
    rows[f"small4_preprocessor_c{args.concurrency}"] = (args.images / (time.perf_counter() - start), lat)
    results = {name: {"images_per_s": rate, "p50_ms": 1e3 * float(np.percentile(l, 50)),
                      "p99_ms": 1e3 * float(np.percentile(l, 99))}
               for name, (rate, l) in rows.items()}
    base = results["mistral_common_direct"]["images_per_s"]
    report = {"bench": "multimodal_preprocess", "image": "1920x1080 JPEG q88",
              "cores": os.cpu_count(), "images": args.images, "results": results,
              "single_image_vs_direct": results["small4_preprocessor"]["images_per_s"] / base,
              "concurrent_vs_direct": results[f"small4_preprocessor_c{args.concurrency}"]["images_per_s"] / base,
              "note": "serial rows use one core; the concurrent row overlaps decode and resize "
                      "(both release the GIL) on every core"}
    print(json.dumps(report, indent=2))
    print(f"\n{'path':>26} | {'images/s':>8} | {'p50 ms':>7} | {'p99 ms':>7}")
    for name, row in results.items():
        print(f"{name:>26} | {row['images_per_s']:8.2f} | {row['p50_ms']:7.1f} | {row['p99_ms']:7.1f}")


if __name__ == "__main__":
    main()
