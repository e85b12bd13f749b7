"""Trainers: TopK pretraining (`top_k`) and SCAE finetuning (`scae`)."""
