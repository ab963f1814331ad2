"""Other tools' quantized checkpoints: importer.py reads AutoAWQ "GEMM" and GPTQ v1 Hugging Face directories into
W4A16 models; exporter.py writes a W4A16 model as either. The packed layouts themselves live in formats/.
"""
