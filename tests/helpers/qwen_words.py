"""The vocabulary of the tiny Qwen2-VL / Qwen2.5-VL processor in the pipeline and video-file tests."""

WORDS = "user assistant what is in the image video ? a red blue green circle colour moves yes no".split()
WORDS += [f"w{i}" for i in range(128 - 4 - 5 - len(WORDS))]  # every id decodes to a word (4 placeholders, 5 specials)
