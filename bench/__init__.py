"""The benchmark (`tokenwire-bench`, or `tokenwire bench`): workloads run in-process on the engine, through
the two services with the SDK, and on transformers baselines, reported as ratios measured in one run.

It sits on top of every other package (engine, client, tokenizer, serving) and nothing imports it.
- cli.py: flags, modes and the run; workloads.py: P1 and the other request sets;
- engine.py / online.py / baselines.py: the in-process, gRPC and transformers modes;
- metrics.py / report.py: latency distributions, the table, JSON and plot;
- profile.py: a torch.profiler breakdown of decode and prefill steps; tokenizer.py: the tokenizer service alone.
- soak.py / soak_report.py: the engine service's memory soak (`tokenwire-bench soak`): RSS under varying shapes.
"""
