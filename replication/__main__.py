from replication.cli import main

main()
