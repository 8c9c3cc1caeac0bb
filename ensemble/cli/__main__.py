from ensemble.cli import app

app()
