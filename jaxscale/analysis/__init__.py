"""What a run costs and did: FLOPs and MFU, inspection, planning, HLO and trace summaries, plots."""
