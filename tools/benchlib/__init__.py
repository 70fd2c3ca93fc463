"""Shared pieces of the benchmark scripts in tools/ (not part of the vlm_dist package).

    photos.py         COCO-sized photo-like JPEGs + a COCO captions file (bench_data, bench_gpu)
    train_bench.py    DeepSpeed training-step measurements (bench_gpu)
    loader_bench.py   the streaming loader's images/s (bench_gpu, bench_data)
    decode_bench.py   KV-cached greedy vs self-speculative decoding (bench_gpu)
    report.py         bench_gpu's Markdown table
    engine_common.py  engine_overhead.py  engine_memory.py   (bench_engine)
"""
