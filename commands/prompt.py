"""sage prompt: render a prompt (and chat messages) from a template and each record."""

from typing import Annotated

import typer

from sage_cli.cli.command import operator_command, single_command_app

app = single_command_app()


@operator_command(app, "prompt")
def prompt_records(
    template: Annotated[
        str,
        typer.Option(
            "--template",
            "-t",
            metavar="NAME|FILE",
            help="A built-in template (qa, summarize, extract) or a template file.",
        ),
    ] = "qa",
    system: Annotated[
        str | None,
        typer.Option("--system", metavar="TEXT", help="A system message placed before the prompt."),
    ] = None,
    n_ctx: Annotated[
        int,
        typer.Option(
            "--n-ctx", min=16, help="The model's context in tokens; the prompt is made to fit."
        ),
    ] = 2048,
    reserve: Annotated[
        int,
        typer.Option(
            "--reserve", min=0, help="Tokens kept free for the answer (sage generate --max-tokens)."
        ),
    ] = 256,
    context_tokens: Annotated[
        int | None,
        typer.Option(
            "--context-tokens", min=0, help="At most this many tokens of documents in {context}."
        ),
    ] = None,
):
    """Render `prompt` and chat `messages` from a template and each record.

    Placeholders: {query}, {context} (the record's `docs` numbered `[1] text`, cut to fit
    --n-ctx minus --reserve, and --context-tokens), any field {text} and items
    {metadata[title]}; {{ and }} are literal braces. A missing field is that record's error;
    a malformed template is exit 2. Templates never run code: attribute access, conversions and
    format specs are refused. A record whose context was cut gets `prompt_truncated: true` and
    a message in `_warnings`. Tokens are estimated without a model (see the docs).

    \b
    Examples:
      sage retrieve --index idx/ < questions.ndjson | sage prompt --template qa | sage generate
      sage prompt --template summarize --system 'Be brief.' docs.ndjson
      sage prompt --template my_template.txt --n-ctx 8192 --reserve 512
    """
    from sage_cli.operators.prompt import Prompt

    return Prompt(
        template, system=system, n_ctx=n_ctx, reserve=reserve, context_tokens=context_tokens
    )
