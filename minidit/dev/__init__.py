"""What checks and measures minidit, apart from what a reader learns DiT from (llm.c keeps dev/ apart the same way):

    strict.py           a CPU stand-in for a device, so the tests catch CuPy mistakes without a GPU
    torch_reference.py  the official DiT in PyTorch (optional), for cross-checks, benchmarks and the test fixture
    latte_reference.py  python -m minidit.dev.latte_reference: the official Latte's float64 fixture (needs its checkout)
    bench.py            python -m minidit.dev.bench: step time, GFLOP/s, memory, optionally against PyTorch
    evaluate.py         python -m minidit.dev.evaluate: an offline sample-quality score for the built-in digits
    experiments.py      python -m minidit.dev.experiments: the paper's conditioning and scaling studies, small

These import the mainline; the mainline never imports them (one exception: backend.get_backend("strict")).
"""
