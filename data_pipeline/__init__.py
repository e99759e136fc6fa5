"""Dataset builder and loader: sources -> tokenizer -> webdataset shards + manifest.

This package never imports ``pretrain`` or ``launch``; the trainer reads what it writes.
The on-disk format is described in ``data_pipeline.shards``.
"""
