from deltafleet.cli.main import app

app()
