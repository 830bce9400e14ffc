"""Offline quick start with the bundled default model (all-MiniLM-L6-v2): embed and score."""

from winnow import LLM


def main() -> None:
    llm = LLM()  # the bundled default; pass a hub id or a local folder for any other model
    query = "What is the capital of France?"
    documents = ["The capital of France is Paris.", "Horses and cows are both animals."]
    for doc, result in zip(documents, llm.score(query, documents)):
        print(f"{result.outputs.score:.3f}  {doc}")
    embedding = llm.embed("winnow separates the wheat from the chaff")[0].outputs.embedding
    print(f"embedding: {len(embedding)} dimensions, first values {[round(x, 4) for x in embedding[:4]]}")


if __name__ == "__main__":
    main()
