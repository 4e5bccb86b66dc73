"""dsv2: DeepSeek-V2 in Python."""
