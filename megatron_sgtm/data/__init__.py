"""The data path: synthetic corpus, readers, tokenizer, shards, tagging classifiers, labels, sampler.

Entry points: `megatron-sgtm data synth|build|tag` (`cli.py`), `corpus.load_corpus`,
`labeling.label_corpus` and `sampler.SGTMSampler`.
"""
