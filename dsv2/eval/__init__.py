"""Evaluation harness: multiple choice, exact-match generation, HumanEval, needle in a haystack,
perplexity; `dsv2 eval` and an lm-evaluation-harness adapter."""
