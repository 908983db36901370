"""The words the simulator's call objects are made of: names, organisations, departments and
notes, each drawn by :mod:`etl.simulator.payload` with a generator seeded per id.

Changing, adding or reordering an entry changes the payload of many ids (the draws pick by
position), and tests and benchmarks pick ids by what they serve.
"""

from __future__ import annotations

# Family and personal names: (name, kana).
FAMILY = (
    ("佐藤", "サトウ"),
    ("鈴木", "スズキ"),
    ("高橋", "タカハシ"),
    ("田中", "タナカ"),
    ("伊藤", "イトウ"),
    ("渡辺", "ワタナベ"),
    ("山本", "ヤマモト"),
    ("中村", "ナカムラ"),
    ("小林", "コバヤシ"),
    ("加藤", "カトウ"),
    ("吉田", "ヨシダ"),
    ("山田", "ヤマダ"),
)
PERSONAL = (
    ("太郎", "タロウ"),
    ("花子", "ハナコ"),
    ("健太", "ケンタ"),
    ("美咲", "ミサキ"),
    ("翔", "ショウ"),
    ("陽菜", "ヒナ"),
    ("大輔", "ダイスケ"),
    ("さくら", "サクラ"),
    ("拓也", "タクヤ"),
    ("結衣", "ユイ"),
)
MIDDLE = (("マリア", "マリア"), ("ジョン", "ジョン"), ("アン", "アン"))

# Organisations and departments, each (name, kana, short name, short kana): customers'
# (ORGS, DEPTS) and the call centre's (CALL_CENTER_ORG, CALL_CENTER_DEPTS).
ORGS = (
    ("株式会社サンプル商事", "カブシキガイシャサンプル", "サンプル商事", "サンプル"),
    ("東京テスト工業株式会社", "トウキョウテストコウギョウ", "東京テスト", "トウキョウテスト"),
    ("合同会社みらい", "ゴウドウガイシャミライ", "みらい", "ミライ"),
    ("Acme Japan K.K.", "アクメジャパン", "Acme", "アクメ"),
    ("さくら不動産株式会社", "サクラフドウサン", "さくら不動産", "サクラ"),
)
DEPTS = (
    ("営業部", "エイギョウブ", "営業", "エイギョウ"),
    ("総務部", "ソウムブ", "総務", "ソウム"),
    ("経理部", "ケイリブ", "経理", "ケイリ"),
    ("情報システム部", "ジョウホウシステムブ", "情シス", "ジョウシス"),
    ("カスタマーサポート部", "カスタマーサポートブ", "CS", "シーエス"),
)
CALL_CENTER_ORG = ("コミューボ株式会社", "コミューボカブシキガイシャ", "コミューボ", "コミューボ")
CALL_CENTER_DEPTS = (
    ("第一コールセンター", "ダイイチコールセンター", "第一CC", "ダイイチシーシー"),
    ("第二コールセンター", "ダイニコールセンター", "第二CC", "ダイニシーシー"),
    ("品質管理課", "ヒンシツカンリカ", "品管", "ヒンカン"),
    ("アウトバウンド課", "アウトバウンドカ", "OB", "オービー"),
)

# A call's note and check point.
NOTES = (
    "折り返し希望",
    "契約内容の確認",
    "不在のため再架電",
    "請求書の再発行依頼",
    "Customer asked about the invoice",
    "Follow-up next week",
    "住所変更の連絡 / address change",
    "クレーム対応（エスカレーション済）",
)
CHECKPOINTS = ("A", "B", "C", "1", "2", "済", "要折返し")
# A customer's own note (the customer record's, not a call's).
CUSTOMER_NOTES = (
    "法人契約",
    "VIP対応",
    "午後の連絡を希望",
    "メール連絡不可",
    "English preferred",
    "請求先変更済",
    "担当者変更あり",
)
