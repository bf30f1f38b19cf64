"""The seed's quick start (SAGE's README), written with sage's verbs: Retriever -> QAPromptor ->
Generator -> a sink. Run it from scripts/examples/ once idx/ is built (`bash ingest.sh`):
`python quickstart.py`. The same pipeline as a YAML file is rag.yaml (`sage run rag.yaml`)."""

from sage_cli.api import LocalEnvironment


def show(record: dict) -> None:
    print({"question": record["text"], "answer": record["answer"]})


env = LocalEnvironment("rag_pipeline")
(
    env.from_source("questions.txt", raw=True)
    .map("retrieve", index="idx/", top_k=2)
    .map("prompt", template="qa")
    .map("generate", max_tokens=32, temperature=0)
    .sink(show)
)
for stage in env.submit():
    print(f"{stage.stage}: {stage.records_in} in, {stage.records_out} out")
