"""Real PumpPortal frames from the protocol reference, byte for byte (tests, benchmarks)."""

CREATE = (
    b'{"signature": "3ShNEcfKhWrvFVTwHCK7FjgWXABAZgo9Cpr2S6AGngg9xDifcQyY2mGQQ85p11vxSRvQ3B3Sba'
    b'ajobL1rfSJmyjG", "mint": "8yZ1rj5nHbUFuCbnoowE6rHLZYiuTe1tbxEskgzUpump", '
    b'"traderPublicKey": "HDypasvYsG5MuABAfaTf78FVYMmYedcbefZ7pxWEhVQV", "txType": "create", '
    b'"initialBuy": 2115327.702796, "solAmount": 0.059259258, "bondingCurveKey": '
    b'"Hgaf727Ccy1YfWAZ77otqmqW5QY8avMXi4pkbRdiomrH", "vTokensInBondingCurve": '
    b'1070884672.297204, "vSolInBondingCurve": 30.059259257999976, "marketCapSol": '
    b'28.069557848389476, "name": "Cash Elon ", "symbol": "CASHELON", "uri": '
    b'"https://ipfs.io/ipfs/bafkreid55z3ln7vg3udpgagfeumjcd7stnfqri7zkc4n227eq4vs24rdj4", '
    b'"is_mayhem_mode": true, "pool": "pump"}'
)

SELL = (
    b'{"signature": "5PEnuUTTiqyEoeXtSdFPC38pY1bFCXFAFXKq52WQBCUPzC8sJLhxNDxPDB9YBrQWZDxB6GTz'
    b'JcPKH399ZpwUP1LY", "mint": "14k7LpDRKvyVuMWfGe1vB5ByoQh1yUQPetApMBLuzw1f", '
    b'"traderPublicKey": "3c6KJRkWtYoGHokK1x1YrYUsNUT672J3RHRgsodhC6KJ", "txType": "sell", '
    b'"tokenAmount": 36189.104326, "solAmount": 0.001014365, "newTokenBalance": 0, '
    b'"bondingCurveKey": "2bQpbWV1FYiddhyEceQf3FuviVPd4JQKYnptHnCEGKR5", '
    b'"vTokensInBondingCurve": 1071666285.328535, "vSolInBondingCurve": 30.03733572726111, '
    b'"marketCapSol": 28.028628070587033, "pool": "pump"}'
)

OLD_BUY = (
    b'{"signature":"XGAnLe4EKCx4NNHv7soDimYZifwRndEGq1myrMDZR6DSRa6FgvcsMbpEz7XJrvRHxH6GcwPTr1o'
    b'Kt9jNWj5T4Uh","mint":"4Wo7nxVsPV125DW3Tr2ppPrzrnNFwidiKjWyVsifpump","traderPublicKey":'
    b'"4ajMNhqWCeDVJtddbNhD3ss5N6CFZ37nV9Mg7StvBHdb","txType":"buy","tokenAmount":'
    b'30582206.734745,"newTokenBalance":30582206.734745,"bondingCurveKey":'
    b'"HPWxfYdBitgdK4VcevMgE1VHaKgpcKJWiJh9dFAsP6SE","vTokensInBondingCurve":977513247.598136,'
    b'"vSolInBondingCurve":32.93049999996889,"marketCapSol":33.68803449046135}'
)

MIGRATE = (
    b'{"signature": "3GD3ohyHT3CvGgVAuXgqtMkxy6KNMFbV875eVePZRZGmP2GTUJSkvL2hrHLzqQvTkBE9HDXbmr'
    b'SeaC2aUCncemVZ", "mint": "DU8QWqR361yn4VQbRjYke4vdaKQYcfvDHsn2bx2cpump", '
    b'"txType": "migrate", "pool": "pump-amm"}'
)

ACK_NEW_TOKEN = b'{"message": "Successfully subscribed to token creation events."}'
ACK_MIGRATION = b'{"message": "Subscribed to \'migration\' events."}'
ACK_KEYS = b'{"message": "Successfully subscribed to keys."}'
API_KEY_MESSAGE = (
    b"{\"message\": \"'subscribeTokenTrade' and 'subscribeAccountTrade' methods are only "
    b'available when connecting with an API key funded with at least 0.02 SOL."}'
)
ERROR_STRING = b'{"errors": "unsubscribeMigration is not a valid method"}'
ERROR_LIST = b'{"errors": ["bad key", "too many keys"]}'
