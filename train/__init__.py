"""Fine-tune BERT-family encoders on GLUE with Accelerate (DDP, ZeRO or FSDP), effective batch 16 anywhere."""

__version__ = "0.1.0"
