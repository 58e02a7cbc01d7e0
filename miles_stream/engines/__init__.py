"""Rollout engines: each samples responses for the producer and takes new weights (`base.RolloutEngine`).

    base.py     the protocol, its request / result types (ids in; ids, logprobs, version spans, routing out)
    http.py     what the engines over HTTP servers read alike (replies, versions, errors)
    pool.py     what they do alike with their servers: rotation, attach / detach, health loop, re-sync
    native/     the embedded PyTorch engine (continuous batching; static KV cache, CUDA graphs on a GPU)
    sglang/     SGLang servers over HTTP (its quirks, each citing SGLang's source, stay in that package)
    vllm/       vLLM servers over HTTP (scale-out + dev routes; quirks cite vLLM 0.32's source; docs/vllm.md)

A new engine is one package here implementing `RolloutEngine` (and `UpdatesFromManifest` if it takes a
published version its own way), plus one entry in `rollout/engines.py`. Engines know nothing of Redis: the
producer (`rollout/`) drives them. Nothing is imported here, so `sglang/config.py` loads without torch.
"""
