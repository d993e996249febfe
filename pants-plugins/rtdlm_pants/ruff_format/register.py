from rtdlm_pants.ruff_format import rules as ruff_format_rules


def rules():
    return ruff_format_rules.rules()
