"""The vocabulary of the tiny LLaVA processor in the evaluation tests, and the special ids they suppress."""

SPECIALS = [0, 1, 2, 3]  # the tiny tokenizer's <pad> <unk> <s> </s>: suppressed so every answer has its full length
# Words for every id of the tiny vocabulary (128, the last one <image>), so that any generated id decodes to a word.
WORDS = "USER ASSISTANT : what is in the image ? a red blue green circle square triangle yes no".split()
WORDS += [f"w{i}" for i in range(128 - 1 - len(SPECIALS) - len(WORDS))]
