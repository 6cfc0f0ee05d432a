"""Running a model: pure sampling filters, the one decoding engine (a batched static KV cache whose rows join and
leave between steps) that generate, chat, serve, bench and the studies all use, the text layer (incremental
detokenizing, stop strings), chat sessions, evaluation (loss and perplexity), and the next-token distribution laid
open for people to look at (distribution.py: lmlab lab's sampling and dropout views)."""
