"""The featadapt demo: LoRA, LoRFA, VeFA and full fine-tuning of a real pretrained encoder
(MiniLM-L6) on real data (Rotten Tomatoes sentiment), with a forgetting probe (WordSim353)
and the intruder-dimension / column-space diagnostics of featadapt.analysis.

Run it with ``python -m featadapt.demo [--quick]``; see ``--help``.
"""
