"""Test tooling: a scripted OpenAI-compatible model, generated haystacks, processes on
loopback and a load driver. Not imported by either function."""
