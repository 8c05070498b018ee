"""The featadapt demo: LoRA, LoRFA, VeFA and full fine-tuning of a real pretrained encoder
(MiniLM-L6) on real data (Rotten Tomatoes sentiment), with a forgetting probe (WordSim353)
and the intruder-dimension / column-space diagnostics of featadapt.analysis.

Run it with ``python -m featadapt.demo [--quick]``; ``--experiment sequential`` adds a second
task (convention speeches) and the Google analogies probe, ``--lr-sweep`` runs each method at
several learning rates; see ``--help``.
"""
